"""Reading the user's data: prompt sources (files and datasets), conversations and
preference records, Human:/Assistant: transcripts."""
